"""The feature gates upstream kube-proxy recognises, and how ``--feature-gates`` /
``featureGates:`` are checked against them.

Upstream (component-base ``featuregate``) rejects a gate it does not know ("unrecognized
feature gate: X") and a locked gate set away from its default, and warns when a GA or
deprecated gate is set. kube-proxy's binary registers every Kubernetes gate (kube, apiserver,
client-go, component-base logging/metrics), so an operator's existing flags may name any of
them: kproxy accepts all of those, logs one line for each it does not act on, and rejects the
rest with upstream's message, exit 2.

The table follows upstream kubernetes/kubernetes, each gate at the newest spec the project
could read (source, from oldest to newest layer):

- v1.36 development line, the complete list: ``pkg/features/kube_features.go``
  (``defaultVersionedKubernetesFeatureGates``: kube, apiserver ``genericfeatures``,
  ``apiextensionsfeatures``, ``kcmfeatures``, ``zpagesfeatures``) plus
  ``staging/src/k8s.io/client-go/features/known_features.go``,
  ``staging/src/k8s.io/component-base/metrics/features`` (``NativeHistograms``, alpha in
  1.36) and component-base logging (``ContextualLogging``, ``LoggingAlphaOptions``,
  ``LoggingBetaOptions``). Gates upstream removed by then (e.g. ``LoadBalancerIPMode``,
  ``ComponentSLIs``, ``StrictCostEnforcementForVAP``) are gone here too, and the kubelet gate
  spelled ``CPUCFSQuotaPeriod`` in Go is registered as ``CustomCPUCFSQuotaPeriod``.
- v1.37 development line, where readable: the scheduling/DRA gate file
  (``SetupCurrentKubernetesSpecificFeatureGates``; e.g. ``CompositePodGroup``,
  ``DRADerivedAttributes``, ``SchedulerPreQueueingHints`` new; ``DRAAdminAccess``,
  ``DRAPrioritizedList``, ``NodeDeclaredFeatures`` GA and locked) and ``ComponentStatusz``
  (beta, on, from 1.36).
- v1.36 gates added after that kube_features.go snapshot, known only from third-party notes
  quoting it: ``ReloadKubeletClientCAFile`` (beta, on), ``WorkloadAwarePreemption`` and
  ``WorkloadWithJob`` (alpha).

So the table is v1.36 with what could be read of v1.37; a gate added later in either (and not
in those files) is rejected as unknown until its row is added. Add a row (name, default,
stage, ``locked``) when upstream adds one; drop a row when upstream drops the gate (its n-3
compatibility window has ended).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from kproxy_core.options import BOOLEAN, MAPPING, OptionError


@attrs.frozen
class Gate:
    name: str
    default: bool
    #: "Alpha", "Beta", "GA" or "Deprecated"
    stage: str
    #: Upstream refuses any value but the default (GA or deprecated gates about to go).
    locked: bool = False


_STAGES = {"A": "Alpha", "B": "Beta", "GA": "GA", "D": "Deprecated"}

# name, default, stage (A/B/GA/D), "locked" when locked to the default
_TABLE = """
AggregatedDiscoveryRemoveBetaType true D locked
AllowDNSOnlyNodeCSR false D
AllowInsecureKubeletCertificateSigningRequests false D
AllowOverwriteTerminationGracePeriodSeconds false D locked
AllowParsingUserUIDFromCertAuth true B
AllowUnsafeMalformedObjectDeletion false A
AnonymousAuthConfigurableEndpoints true GA locked
AnyVolumeDataSource true GA locked
APIResponseCompression true B
APIServerIdentity true B
APIServerTracing true GA locked
APIServingWithRoutine false A
AuthorizeNodeWithSelectors true GA locked
AuthorizePodWebsocketUpgradeCreatePermission true B
AuthorizeWithSelectors true GA locked
BtreeWatchCache true GA locked
CBORServingAndStorage false A
ChangeContainerStatusOnKubeletRestart false D
ClearingNominatedNodeNameAfterBinding true B
ClientsAllowCBOR false A
ClientsPreferCBOR false A
CloudControllerManagerWatchBasedRoutesReconciliation false A
CloudControllerManagerWebhook false A
ClusterTrustBundle false B
ClusterTrustBundleProjection false B
ComponentFlagz false A
ComponentStatusz true B
CompositePodGroup false A
ConcurrentWatchObjectDecode false B
ConsistentListFromCache true GA locked
ConstrainedImpersonation false A
ContainerCheckpoint true B
ContainerRestartRules true B
ContainerStopSignals false A
ContextualLogging true B
CoordinatedLeaderElection false B
CPUManagerPolicyAlphaOptions false A
CPUManagerPolicyBetaOptions true B
CPUManagerPolicyOptions true GA locked
CRDObservedGenerationTracking false B
CRDValidationRatcheting true GA locked
CrossNamespaceVolumeDataSource false A
CSIMigrationPortworx true GA locked
CSIServiceAccountTokenSecrets true B
CSIVolumeHealth false A
CustomCPUCFSQuotaPeriod false A
CustomResourceFieldSelectors true GA locked
DeclarativeValidation true B
DeclarativeValidationTakeover false B
DeploymentReplicaSetTerminatingReplicas true B
DetectCacheInconsistency true B
DisableAllocatorDualWrite true GA locked
DisableCPUQuotaWithExclusiveCPUs true B
DisableNodeKubeProxyVersion true D
DRAAdminAccess true GA locked
DRAConsumableCapacity true B
DRADerivedAttributes false A
DRADeviceBindingConditions true B
DRADeviceCompatibilityGroups false A
DRADeviceTaintRules true GA
DRADeviceTaints true GA
DRAExtendedResource true GA locked
DRAFractionalCapacityRange true B
DRAListTypeAttributes false A
DRANodeAllocatableResources false A
DRAOptionalNodeOperations false A
DRAPartitionableDevices true B
DRAPrioritizedList true GA locked
DRAResourceClaimDeviceStatus true GA locked
DRASchedulerFilterTimeout true B
DRAWorkloadResourceClaims false B
DynamicResourceAllocation true GA locked
EnvFiles true B
EventedPLEG false A
ExecProbeTimeout true GA locked
ExternalServiceAccountTokenSigner true B
GangScheduling false A
GenericWorkload false B
GitRepoVolumeDriver false D
GracefulNodeShutdown true B
GracefulNodeShutdownBasedOnPodPriority true B
HonorPVReclaimPolicy true GA locked
HostnameOverride true B
HPAConfigurableTolerance true B
HPAScaleToZero false A
ImageMaximumGCAge true GA locked
ImageVolume true B
ImageVolumeWithDigest false A
InformerResourceVersion true GA
InOrderInformers true B
InPlacePodLevelResourcesVerticalScaling true B
InPlacePodVerticalScaling true GA locked
InPlacePodVerticalScalingAllocatedStatus false D
InPlacePodVerticalScalingExclusiveCPUs false A
InPlacePodVerticalScalingExclusiveMemory false A
InPlacePodVerticalScalingSchedulerPreemption false A
InterPodAffinityHostnameFastPath false A
InTreePluginPortworxUnregister false A
JobBackoffLimitPerIndex true GA locked
JobManagedBy true GA locked
JobPodReplacementPolicy true GA locked
JobSuccessPolicy true GA locked
KMSv1 false D
KubeletCgroupDriverFromCRI true GA locked
KubeletCrashLoopBackOffMax true B
KubeletEnsureSecretPulledImages true B
KubeletFineGrainedAuthz true B
KubeletInUserNamespace false A
KubeletPodResourcesDynamicResources true B
KubeletPodResourcesGet true B
KubeletPodResourcesListUseActivePods true D
KubeletPSI true B
KubeletRegistrationGetOnExistsOnly false D
KubeletSeparateDiskGC true B
KubeletServiceAccountTokenForCredentialProviders true B
KubeletTracing true GA locked
ListFromCacheSnapshot true B
LocalStorageCapacityIsolationFSQuotaMonitoring false B
LogarithmicScaleDown true GA locked
LoggingAlphaOptions false A
LoggingBetaOptions true B
MatchLabelKeysInPodAffinity true GA locked
MatchLabelKeysInPodTopologySpread true B
MatchLabelKeysInPodTopologySpreadSelectorMerge true B
MaxUnavailableStatefulSet true B
MemoryManager true GA locked
MemoryQoS false A
MultiCIDRServiceAllocator true GA locked
MutableCSINodeAllocatableCount true B
MutablePodResourcesForSuspendedJobs false A
MutablePVNodeAffinity false A
MutableSchedulingDirectivesForSuspendedJobs false A
MutatingAdmissionPolicy false B
NativeHistograms false A
NFTablesProxyMode true GA locked
NodeDeclaredFeatures true GA locked
NodeInclusionPolicyInPodTopologySpread true GA locked
NodeLogQuery false B
NodeSwap true GA locked
NominatedNodeNameForExpectation true B
OpenAPIEnums true B
OpportunisticBatching true B
OrderedNamespaceDeletion true GA locked
PodAndContainerStatsFromCRI false A
PodCertificateRequest false B
PodDeletionCost true B
PodGroupPreemptionPolicy false A
PodLevelResources true B
PodLifecycleSleepAction true GA locked
PodLifecycleSleepActionAllowZero true GA locked
PodLogsQuerySplitStreams false A
PodObservedGenerationTracking true GA locked
PodReadyToStartContainersCondition true B
PodSchedulingReadiness true GA locked
PodTopologyLabelsAdmission true B
PortForwardWebsockets true B
PreferSameTrafficDistribution true GA locked
PreventStaticPodAPIReferences true B
ProcMountType true B
QOSReserved false A
RecoverVolumeExpansionFailure true GA locked
RecursiveReadOnlyMounts true GA locked
ReduceDefaultCrashLoopBackOffDecay false A
RelaxedDNSSearchValidation true GA locked
RelaxedEnvironmentVariableValidation true GA locked
RelaxedServiceNameValidation false A
ReloadKubeletClientCAFile true B
ReloadKubeletServerCertificateFile true B
RemoteRequestHeaderUID true B
ResilientWatchCacheInitialization true GA locked
ResourceHealthStatus false A
RestartAllContainersOnContainerExits false A
RetryGenerateName true GA locked
RotateKubeletServerCertificate true B
RuntimeClassInImageCriAPI false A
SchedulerAsyncAPICalls false B
SchedulerAsyncPreemption true B
SchedulerPopFromBackoffQ true B
SchedulerPreQueueingHints false A
SchedulerQueueingHints true GA locked
SELinuxChangePolicy true B
SELinuxMount false B
SELinuxMountReadWriteOncePod true B
SeparateCacheWatchRPC false D
SeparateTaintEvictionController true GA locked
ServiceAccountNodeAudienceRestriction true B
ServiceAccountTokenJTI true GA locked
ServiceAccountTokenNodeBinding true GA locked
ServiceAccountTokenNodeBindingValidation true GA locked
ServiceAccountTokenPodNodeInfo true GA locked
ServiceTrafficDistribution true GA locked
SidecarContainers true GA locked
SizeBasedListCostEstimate true B
StatefulSetSemanticRevisionComparison true B
StorageCapacityScoring true B
StorageNamespaceIndex true D
StorageVersionAPI false A
StorageVersionHash true B
StorageVersionMigrator false B
StreamingCollectionEncodingToJSON true GA locked
StreamingCollectionEncodingToProtobuf true GA locked
StrictIPCIDRValidation false A
StructuredAuthenticationConfiguration true GA locked
StructuredAuthenticationConfigurationEgressSelector true B
StructuredAuthenticationConfigurationJWKSMetrics true B
StructuredAuthorizationConfiguration true GA locked
SupplementalGroupsPolicy true GA locked
SystemdWatchdog true GA locked
TaintTolerationComparisonOperators false A
TokenRequestServiceAccountUIDValidation true B
TopologyAwareHints true GA locked
TopologyAwareWorkloadScheduling false A
TopologyManagerPolicyAlphaOptions false A
TopologyManagerPolicyBetaOptions true B
TopologyManagerPolicyOptions true GA
TranslateStreamCloseWebsocketRequests true B
UnauthenticatedHTTP2DOSMitigation true B
UnknownVersionInteroperabilityProxy false A
UserNamespacesHostNetworkSupport false A
UserNamespacesSupport true B
VolumeAttributesClass true GA locked
VolumeLimitScaling true B
WatchCacheInitializationPostStartHook false B
WatchFromStorageWithoutResourceVersion false D locked
WatchList false B
WatchListClient true B
WindowsCPUAndMemoryAffinity false A
WindowsGracefulNodeShutdown true B
WindowsHostNetwork false D
WinDSR true GA locked
WinOverlay true GA locked
WorkloadAwarePreemption false A
WorkloadWithJob false A
"""


def _load(table: str) -> dict[str, Gate]:
    gates: dict[str, Gate] = {}
    for row in table.strip().splitlines():
        name, default, stage, *rest = row.split()
        gates[name] = Gate(name, default == "true", _STAGES[stage], rest == ["locked"])
    return gates


KNOWN: Mapping[str, Gate] = _load(_TABLE)

#: component-base's meta gates: set every alpha / beta gate at once.
SPECIAL = frozenset({"AllAlpha", "AllBeta"})

#: Gates whose value changes what kproxy does. None yet: kproxy behaves as upstream does with
#: every gate at its default (e.g. trafficDistribution and nftables mode are always on).
IMPLEMENTED: frozenset[str] = frozenset()


def parse(value: object) -> dict[str, bool]:
    """``A=true,B=false`` (flag) or a mapping (config file) to ``{name: bool}``; raises
    `OptionError` with upstream's wording for an unknown or locked gate or a non-bool value."""
    result: dict[str, bool] = {}
    for name, raw in MAPPING.parse(value).items():
        if name not in KNOWN and name not in SPECIAL:
            raise OptionError(f"unrecognized feature gate: {name}")
        try:
            enabled = BOOLEAN.parse(raw)
        except OptionError:
            raise OptionError(
                f"invalid value of {name}={raw}: expected true or false") from None
        gate = KNOWN.get(name)
        if gate is not None and gate.locked and enabled != gate.default:
            raise OptionError(f"cannot set feature gate {name} to {str(enabled).lower()}, "
                              f"feature is locked to {str(gate.default).lower()}")
        result[name] = enabled
    return result


def notes(gates: Mapping[str, bool]) -> list[str]:
    """One line per gate that is set: upstream's GA/deprecation warning, and that kproxy
    ignores the gates it does not implement."""
    lines: list[str] = []
    for name in sorted(gates):
        value = str(gates[name]).lower()
        gate = KNOWN.get(name)
        if gate is not None and gate.stage in ("GA", "Deprecated"):
            kind = "GA" if gate.stage == "GA" else "deprecated"
            lines.append(f"setting {kind} feature gate {name}={value}: it will be removed in "
                         "a future release")
        if name not in IMPLEMENTED:
            lines.append(f"feature gate {name}={value} is recognised but kproxy does not "
                         "implement it: ignored")
    return lines
